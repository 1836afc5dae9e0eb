"""Full-text search kept in step with every mailbox by the EVENTS stream (issue 4)."""
