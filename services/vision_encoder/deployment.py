"""Ray Serve deployment `VisionEncoder`: images in (encoded files), LLM-width embeddings out.

Concurrent requests are batched (`serve.batch`) into one encoder call, so many sessions' frames share forward
passes; the encoder itself batches slices `batch_size` at a time like upstream.
"""

from __future__ import annotations

from ray import serve

from protos.minicpmo.v1 import vision_pb2
from services.common.tensor_codec import to_proto
from services.gateway import metrics
from services.gateway.stage import device_alive, limit_threads, off_loop, replica_dtype


@serve.deployment(
    name="VisionEncoder",
    max_ongoing_requests=32,
    ray_actor_options={"num_cpus": 0.25},
    health_check_period_s=10,
)
class VisionEncoder:
    def __init__(self, model_dir: str, device: str = "cpu", batch_size: int | None = None):
        from services.vision_encoder.encoder import VisionEncoder as Encoder

        limit_threads()
        self.device = device
        self.encoder = Encoder(model_dir, device=device, dtype=replica_dtype(device), batch_size=batch_size)

    async def Encode(self, request: vision_pb2.EncodeImagesRequest) -> vision_pb2.EncodeImagesResponse:
        with metrics.stage_timer("vision"):
            result = await self._encode_batched(request)
        if isinstance(result, Exception):  # this request's own input error, kept apart from its batch neighbours
            raise result
        return result

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.002)
    async def _encode_batched(
        self, requests: list[vision_pb2.EncodeImagesRequest]
    ) -> list[vision_pb2.EncodeImagesResponse | Exception]:
        # One encoder call per slicing limit: requests with the same limit share forward passes.
        by_limit: dict[int, list[int]] = {}
        for i, r in enumerate(requests):
            by_limit.setdefault(r.max_slice_nums, []).append(i)
        out: list = [None] * len(requests)
        for limit, idxs in by_limit.items():
            images = [bytes(img) for i in idxs for img in requests[i].images]
            try:
                encoded = await off_loop(self.encoder.encode, images, limit or None)
            except ValueError:
                # One bad image must not fail its batch neighbours: redo them one by one so only it fails.
                encoded = None
            if encoded is None:
                for i in idxs:
                    out[i] = await self._encode_one(requests[i])
                continue
            pos = 0
            for i in idxs:
                n = len(requests[i].images)
                out[i] = vision_pb2.EncodeImagesResponse(images=[_to_msg(e) for e in encoded[pos : pos + n]])
                pos += n
        return out

    async def _encode_one(self, request: vision_pb2.EncodeImagesRequest) -> vision_pb2.EncodeImagesResponse | Exception:
        try:
            encoded = await off_loop(self.encoder.encode, [bytes(b) for b in request.images], request.max_slice_nums or None)
        except ValueError as e:
            return e
        return vision_pb2.EncodeImagesResponse(images=[_to_msg(e) for e in encoded])

    def check_health(self) -> None:
        device_alive(self.device)


def _to_msg(e) -> vision_pb2.EncodedImage:
    cols, rows = e.layout.grid or (0, 0)
    return vision_pb2.EncodedImage(
        embeddings=to_proto(e.embeddings), grid_cols=cols, grid_rows=rows, n_slices=e.layout.n_slices
    )
