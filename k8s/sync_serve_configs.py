"""Copy the Serve configs of deploy/ into the k8s manifests that embed them (serveConfigV2), verbatim.

    .venv/bin/python k8s/sync_serve_configs.py

KubeRay takes the Serve config as a string inside the RayService, and kustomize cannot read files outside
k8s/, so the manifests hold copies; tests/deploy fails until the copies match deploy/ again.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# manifest -> (the line that opens the embedded block, the Serve config it holds)
EMBEDDED = {
    "k8s/base/rayservice.yaml": ("serveConfigV2: |", "deploy/single-gpu-node.yaml"),
    "k8s/overlays/dev/rayservice-cpu.yaml": ("value: |", "deploy/local-cpu.yaml"),
    "k8s/overlays/prod/rayservice-gpu.yaml": ("value: |", "deploy/multi-node.yaml"),
}


def embed(manifest: str, opener: str, config: str) -> str:
    """`manifest` with the block scalar after its first `opener` line replaced by `config`."""
    lines = manifest.splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.strip() == opener)
    indent = " " * (len(lines[start]) - len(lines[start].lstrip()) + 2)
    end = start + 1
    while end < len(lines) and (not lines[end].strip() or lines[end].startswith(indent)):
        end += 1
    block = [indent + line if line.strip() else "\n" for line in config.splitlines(keepends=True)]
    return "".join(lines[: start + 1] + block + lines[end:])


def main() -> None:
    for manifest, (opener, config) in EMBEDDED.items():
        path = ROOT / manifest
        updated = embed(path.read_text(), opener, (ROOT / config).read_text())
        if updated != path.read_text():
            path.write_text(updated)
            print(f"updated {manifest} from {config}")


if __name__ == "__main__":
    main()
