"""SpecServe's gRPC API: ``specserve.proto`` and the code generated from it.

Regenerate after editing the proto (from the repository root)::

    python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. \
        specserve/deployments/grpc/specserve.proto
"""
