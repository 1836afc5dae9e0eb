"""Generated protobuf and gRPC stubs for package mailgrid.v1 (``make protos``)."""
