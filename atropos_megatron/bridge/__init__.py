"""The gRPC bridge: Atropos REST on one side, the trainer and inference servers on the other.

The only package that imports grpc. ``v1/`` holds the stubs generated from
``protos/atropos_megatron/bridge/v1/bridge.proto`` (``make protos``), nothing hand-written.
"""
