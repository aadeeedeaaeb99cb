"""The one import point for generated protobuf code.

Messages are generated into package `meshserve.v2` rather than Triton's `inference`, because
tritonclient registers its own `inference.*` descriptors in the same default pool and a process
(the Triton-sidecar node, the tests) must be able to hold both. Only the method path travels on
the wire, so servers and stubs bind to `/inference.GRPCInferenceService/<Method>` explicitly:
see INFERENCE_METHODS. meshserve's own management service is served under its own name.
"""

from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message_factory import GetMessageClass

from meshpb import inference_pb2 as pb
from meshpb import management_pb2 as mpb

# method -> (request class, response class, client streams, server streams)
Methods = dict[str, tuple[type, type, bool, bool]]


def _methods(service: ServiceDescriptor) -> Methods:
    return {
        m.name: (GetMessageClass(m.input_type), GetMessageClass(m.output_type), m.client_streaming,
                 m.server_streaming)
        for m in service.methods
    }


INFERENCE_SERVICE = "inference.GRPCInferenceService"
INFERENCE_METHODS = _methods(pb.DESCRIPTOR.services_by_name["GRPCInferenceService"])
MANAGEMENT_SERVICE = mpb.DESCRIPTOR.services_by_name["Management"].full_name
MANAGEMENT_METHODS = _methods(mpb.DESCRIPTOR.services_by_name["Management"])

__all__ = ["INFERENCE_METHODS", "INFERENCE_SERVICE", "MANAGEMENT_METHODS", "MANAGEMENT_SERVICE", "Methods", "mpb",
           "pb"]
