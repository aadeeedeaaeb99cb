"""The one import point for generated protobuf code.

Messages are generated into package `meshserve.v2` rather than Triton's `inference`, because
tritonclient registers its own `inference.*` descriptors in the same default pool and a process
(the Triton-sidecar node, the tests) must be able to hold both. Only the method path travels on
the wire, so servers and stubs bind to `/inference.GRPCInferenceService/<Method>` explicitly:
see INFERENCE_METHODS.
"""

from meshpb import inference_pb2 as pb

INFERENCE_SERVICE = "inference.GRPCInferenceService"

# method -> (request class, response class, client streams, server streams)
INFERENCE_METHODS: dict[str, tuple[type, type, bool, bool]] = {
    "ServerLive": (pb.ServerLiveRequest, pb.ServerLiveResponse, False, False),
    "ServerReady": (pb.ServerReadyRequest, pb.ServerReadyResponse, False, False),
    "ModelReady": (pb.ModelReadyRequest, pb.ModelReadyResponse, False, False),
    "ServerMetadata": (pb.ServerMetadataRequest, pb.ServerMetadataResponse, False, False),
    "ModelMetadata": (pb.ModelMetadataRequest, pb.ModelMetadataResponse, False, False),
    "ModelInfer": (pb.ModelInferRequest, pb.ModelInferResponse, False, False),
    "ModelStreamInfer": (pb.ModelInferRequest, pb.ModelStreamInferResponse, True, True),
    "RepositoryIndex": (pb.RepositoryIndexRequest, pb.RepositoryIndexResponse, False, False),
    "RepositoryModelLoad": (pb.RepositoryModelLoadRequest, pb.RepositoryModelLoadResponse, False, False),
    "RepositoryModelUnload": (pb.RepositoryModelUnloadRequest, pb.RepositoryModelUnloadResponse, False, False),
}

__all__ = ["INFERENCE_METHODS", "INFERENCE_SERVICE", "pb"]
