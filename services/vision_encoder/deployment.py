"""Ray Serve deployment `VisionEncoder`: images in (encoded files), LLM-width embeddings out.

Concurrent requests are batched (`services.runtime.batching.Batcher`) into one encoder call per slicing limit,
so many sessions' frames share forward passes; the encoder itself batches slices `batch_size` at a time like
upstream. A bad image fails only its own request.
"""

from __future__ import annotations

from ray import serve

from protos.minicpmo.v1 import tensor_pb2, vision_pb2
from services.common.tensor_codec import to_proto
from services.runtime import metrics
from services.runtime.batching import Batcher, each_alone_on_error, result_of
from services.runtime.direct import DirectReplica
from services.runtime.replica import device_alive, limit_threads, replica_dtype, reports_startup
from services.vision_encoder.encoder import EncodedImage, ImageEmbedder


def _embeddings(encoded: list[EncodedImage]) -> tensor_pb2.Embeddings:
    return tensor_pb2.Embeddings(
        modality=tensor_pb2.Embeddings.MODALITY_IMAGE, items=[to_proto(e.embeddings) for e in encoded]
    )


@serve.deployment(name="VisionEncoder")
class VisionEncoder(DirectReplica):
    direct_methods = {"Encode": vision_pb2.EncodeImagesRequest}

    @reports_startup
    def __init__(self, model_dir: str, device: str = "cpu", batch_size: int | None = None):
        limit_threads()
        self.device = device
        self.embedder = ImageEmbedder.from_checkpoint(
            model_dir, device=device, dtype=replica_dtype(device), batch_size=batch_size
        )
        self.batcher = Batcher(each_alone_on_error(self._encode_many))

    async def Encode(self, request: vision_pb2.EncodeImagesRequest) -> tensor_pb2.Embeddings:
        with metrics.stage_timer("vision"):
            return result_of(await self.batcher.submit(request))

    def _encode_many(self, requests: list[vision_pb2.EncodeImagesRequest]) -> list[tensor_pb2.Embeddings]:
        """One encoder call per slicing limit: requests with the same limit share forward passes."""
        by_limit: dict[int, list[int]] = {}
        for i, r in enumerate(requests):
            by_limit.setdefault(r.max_slice_nums, []).append(i)
        out: list = [None] * len(requests)
        for limit, idxs in by_limit.items():
            encoded = self.embedder.encode([bytes(img) for i in idxs for img in requests[i].images], limit or None)
            pos = 0
            for i in idxs:
                n = len(requests[i].images)
                out[i] = _embeddings(encoded[pos : pos + n])
                pos += n
        return out

    def check_health(self) -> None:
        device_alive(self.device)
