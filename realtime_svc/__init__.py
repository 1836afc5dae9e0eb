"""Live event streams (see the realtime issue)."""
