"""gRPC edge: validate, convert protobuf <-> domain values, await the engine. Protobuf stops here."""
