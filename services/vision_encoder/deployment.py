"""Ray Serve deployment `VisionEncoder`: images in (encoded files), LLM-width embeddings out.

Concurrent requests are batched (`serve.batch`) into one encoder call, so many sessions' frames share forward
passes; the encoder itself batches slices `batch_size` at a time like upstream.
"""

from __future__ import annotations

from ray import serve

from protos.minicpmo.v1 import tensor_pb2, vision_pb2
from services.common.tensor_codec import to_proto
from services.runtime import metrics
from services.runtime.replica import device_alive, limit_threads, off_loop, replica_dtype
from services.vision_encoder.encoder import EncodedImage, ImageEmbedder


def _embeddings(encoded: list[EncodedImage]) -> tensor_pb2.Embeddings:
    return tensor_pb2.Embeddings(
        modality=tensor_pb2.Embeddings.MODALITY_IMAGE, items=[to_proto(e.embeddings) for e in encoded]
    )


@serve.deployment(name="VisionEncoder")
class VisionEncoder:
    def __init__(self, model_dir: str, device: str = "cpu", batch_size: int | None = None):
        limit_threads()
        self.device = device
        self.embedder = ImageEmbedder.from_checkpoint(
            model_dir, device=device, dtype=replica_dtype(device), batch_size=batch_size
        )

    async def Encode(self, request: vision_pb2.EncodeImagesRequest) -> tensor_pb2.Embeddings:
        with metrics.stage_timer("vision"):
            result = await self._encode_batched(request)
        if isinstance(result, Exception):  # this request's own input error, kept apart from its batch neighbours
            raise result
        return result

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.002)
    async def _encode_batched(
        self, requests: list[vision_pb2.EncodeImagesRequest]
    ) -> list[tensor_pb2.Embeddings | Exception]:
        # One encoder call per slicing limit: requests with the same limit share forward passes.
        by_limit: dict[int, list[int]] = {}
        for i, r in enumerate(requests):
            by_limit.setdefault(r.max_slice_nums, []).append(i)
        out: list = [None] * len(requests)
        for limit, idxs in by_limit.items():
            images = [bytes(img) for i in idxs for img in requests[i].images]
            try:
                encoded = await off_loop(self.embedder.encode, images, limit or None)
            except ValueError:
                # One bad image must not fail its batch neighbours: redo them one by one so only it fails.
                for i in idxs:
                    out[i] = await self._encode_one(requests[i])
                continue
            pos = 0
            for i in idxs:
                n = len(requests[i].images)
                out[i] = _embeddings(encoded[pos : pos + n])
                pos += n
        return out

    async def _encode_one(self, request: vision_pb2.EncodeImagesRequest) -> tensor_pb2.Embeddings | Exception:
        try:
            images = [bytes(b) for b in request.images]
            return _embeddings(await off_loop(self.embedder.encode, images, request.max_slice_nums or None))
        except ValueError as e:
            return e

    def check_health(self) -> None:
        device_alive(self.device)
