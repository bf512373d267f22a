"""Generated protobuf and gRPC code for draftflow.v1 (see scripts/gen_proto.py). Do not edit."""
