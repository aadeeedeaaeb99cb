"""The floor: the least a Python server of the Triton gRPC protocol must do to serve one ONNX model.

`python -m bench.floor --model PATH --port 0` prints `floor ready port=N` and serves until SIGTERM,
SIGINT or, when its standard input is a pipe, that pipe's end (so a crashed bench never leaves it behind).

Honest, not handicapped: the same transport module as the node (so the same gRPC options and
handler registration), ORT with one intra-op thread run inline on the loop (`--threads N`: on grpcio's
threaded server with ModelInfer taken off its C core by up to N threads, as the node's local hits run), and raw
FP32 decoded with np.frombuffer.
Only checks a benchmark client cannot trip are left out.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from bench.serving import serve_until_stopped
from meshnode.net import transport
from meshnode.net.direct_calls import DirectCall
from meshpb import pb

READY_PREFIX = "floor ready port="
VERSION = "1"
# ORT names float tensors 'tensor(float)'; the floor serves FP32 models only.
_FP32 = "tensor(float)"


def session_options() -> ort.SessionOptions:
    """What the node gives each session: one intra-op thread, sequential, errors-only logging."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return options


def create_session(model: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(model), session_options(), providers=["CPUExecutionProvider"])


def _metadata(arg: ort.NodeArg) -> pb.ModelMetadataResponse.TensorMetadata:
    shape = [d if isinstance(d, int) else -1 for d in arg.shape]
    return pb.ModelMetadataResponse.TensorMetadata(name=arg.name, datatype="FP32", shape=shape)


def handlers(session: ort.InferenceSession, name: str, threaded: bool = False) -> dict[str, Callable[..., Any]]:
    args = [*session.get_inputs(), *session.get_outputs()]
    if any(a.type != _FP32 for a in args):
        raise SystemExit("bench.floor serves FP32 models only")
    metadata = pb.ModelMetadataResponse(
        name=name, versions=[VERSION], platform="onnxruntime_onnx",
        inputs=[_metadata(a) for a in session.get_inputs()],
        outputs=[_metadata(a) for a in session.get_outputs()],
    )
    output_names = [a.name for a in session.get_outputs()]
    run = session.run

    def infer(request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        feeds = {
            tensor.name: np.frombuffer(raw, np.float32).reshape(tensor.shape)
            for tensor, raw in zip(request.inputs, request.raw_input_contents, strict=True)
        }
        arrays = run(output_names, feeds)
        return pb.ModelInferResponse(
            model_name=name, model_version=VERSION, id=request.id,
            outputs=[pb.ModelInferResponse.InferOutputTensor(name=n, datatype="FP32", shape=a.shape)
                     for n, a in zip(output_names, arrays, strict=True)],
            raw_output_contents=[a.tobytes() for a in arrays],
        )

    async def ModelInfer(request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        return infer(request)

    async def ServerLive(request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=True)

    async def ModelReady(request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=request.name == name)

    async def ModelMetadata(request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        return metadata

    if threaded:
        return {"ModelInfer": lambda request, context: infer(request), "ServerLive": _sync(ServerLive),
                "ServerReady": _sync(ServerReady), "ModelReady": _sync(ModelReady),
                "ModelMetadata": _sync(ModelMetadata)}
    return {"ModelInfer": ModelInfer, "ServerLive": ServerLive, "ServerReady": ServerReady,
            "ModelReady": ModelReady, "ModelMetadata": ModelMetadata}


def _sync(handler: Callable[[Any, Any], Coroutine[Any, Any, Any]]) -> Callable[[Any, Any], Any]:
    """A handler that never awaits, run to its end on the calling thread."""
    def call(request: Any, context: Any) -> Any:
        try:
            handler(request, context).send(None)
        except StopIteration as done:
            return done.value
        raise AssertionError("a floor handler awaited")

    return call


async def serve(model: Path, name: str, host: str, port: int, threads: int) -> None:
    session = create_session(model)
    if threads:
        threaded = transport.create_threaded_server(threads)
        served = handlers(session, name, threaded=True)
        infer = served.pop("ModelInfer")

        def answer(call: DirectCall) -> None:  # as the node's hits: on the thread that took the call
            call.reply(infer(pb.ModelInferRequest.FromString(call.request), call).SerializeToString())

        direct = transport.serve_directly(threaded, "ModelInfer", answer, threads)
        transport.add_inference_service(threaded, served)
        bound = transport.bind(threaded, host, port)
        threaded.start()
        direct.start()
        await serve_until_stopped(f"{READY_PREFIX}{bound}")
        threaded.stop(0)
        direct.stop()
        return
    server = transport.create_server()
    transport.add_inference_service(server, handlers(session, name))
    bound = transport.bind(server, host, port)
    await server.start()
    await serve_until_stopped(f"{READY_PREFIX}{bound}")
    await server.stop(0)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="model.onnx file")
    parser.add_argument("--name", default="mlp", help="model name it answers to (default mlp)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed)")
    parser.add_argument("--threads", type=int, default=0,
                        help="serve on grpcio's threaded server, ModelInfer on up to this many polling threads "
                             "(default 0: grpc.aio)")
    args = parser.parse_args()
    asyncio.run(serve(args.model, args.name, args.host, args.port, args.threads))


if __name__ == "__main__":
    main()
