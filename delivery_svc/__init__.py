"""Mail flows: inbound workers now, outbound workers later."""
