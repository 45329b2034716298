"""A minimal Ferroserve client in Python, generated from proto/ with grpcio-tools.

    python3 -m pip install grpcio grpcio-tools
    python3 -m grpc_tools.protoc -Iproto --python_out=examples/python --grpc_python_out=examples/python \
        proto/ferroserve/v1/inference.proto
    python3 examples/python/client.py "What is the capital of France?"
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import grpc  # noqa: E402
from ferroserve.v1 import inference_pb2, inference_pb2_grpc  # noqa: E402


def main() -> None:
    question = sys.argv[1] if len(sys.argv) > 1 else "What is the capital of France?"
    addr = os.environ.get("FERROSERVE_ADDR", "127.0.0.1:50051")
    with grpc.insecure_channel(addr) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        request = inference_pb2.GenerateRequest(
            messages=[inference_pb2.ChatMessage(role="user", content=question)],
            max_tokens=64,
            sampling=inference_pb2.SamplingParams(temperature=0.0),
        )
        for event in stub.GenerateStream(request, timeout=60):
            if event.HasField("token"):
                print(event.token.text, end="", flush=True)
            else:
                done = event.complete
                reason = inference_pb2.FinishReason.Name(done.finish_reason)
                print(f"\n[{reason}] {done.usage.completion_tokens} tokens from {done.model_version}")


if __name__ == "__main__":
    main()
