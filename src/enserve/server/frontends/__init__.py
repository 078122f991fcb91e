"""The fronts: KServe v2 over gRPC (the native front and the grpcio servicer) and HTTP, the protobuf
codec, tokens and TLS, and the one table from errors to gRPC codes and HTTP statuses."""
