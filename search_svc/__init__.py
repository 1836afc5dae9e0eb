"""Full-text search (see the search issue)."""
