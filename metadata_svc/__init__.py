"""The mailbox store: users, folders, messages, flags, threads; raw messages in blobs."""
