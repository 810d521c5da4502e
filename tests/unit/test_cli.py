"""The `minicpmo` router: lazy subcommands and clean errors from gRPC client subcommands."""

import argparse

import grpc
import pytest

from services.common import cli


class _Denied(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAUTHENTICATED

    def details(self) -> str:
        return "unknown API key"


def test_rpc_error_prints_status_and_exits_1(monkeypatch, capsys) -> None:
    def failing(_args: argparse.Namespace) -> int:
        raise _Denied()

    parser = argparse.ArgumentParser()
    parser.set_defaults(func=failing, command="chat")
    monkeypatch.setattr(cli, "build_parser", lambda argv: parser)
    assert cli.main([]) == 1
    assert capsys.readouterr().err.strip() == "minicpmo chat: UNAUTHENTICATED: unknown API key"


def test_help_lists_every_subcommand_without_importing_them(capsys) -> None:
    with pytest.raises(SystemExit) as done:
        cli.main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in cli.SUBCOMMANDS)


def test_stereo_files_are_sent_as_mono_of_the_same_length(tmp_path) -> None:
    import numpy as np
    import soundfile as sf

    from services.client.cli import read_audio

    left = np.linspace(-0.5, 0.5, 8000, dtype=np.float32)
    sf.write(tmp_path / "stereo.wav", np.stack([left, -left], axis=1), 16000, subtype="FLOAT")
    pcm, rate = read_audio(tmp_path / "stereo.wav")
    assert rate == 16000 and pcm.shape == (8000,) and np.allclose(pcm, 0.0)


@pytest.mark.parametrize("content", [None, b"this is not audio"])
def test_missing_or_non_audio_files_exit_with_a_message(tmp_path, content) -> None:
    from services.client.cli import read_audio

    path = tmp_path / "speech.wav"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SystemExit) as done:
        read_audio(path)
    assert str(path) in str(done.value) and ("no such file" in str(done.value) or "not a readable" in str(done.value))


def test_cli_processes_put_large_tensors_on_huge_pages_where_the_kernel_allows() -> None:
    """The CLI sets torch's huge-page switch before torch loads (benchmarks run stages in the CLI process, and
    measure what the replicas run). A fresh process, since this one loaded torch long ago."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    script = (
        "import os\n"
        "from services.common import cli\n"
        "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "import torch\n"
        "t = torch.ones(32 << 20, dtype=torch.uint8)\n"
        "huge = [l for l in open('/proc/self/smaps_rollup') if l.startswith('AnonHugePages')][0]\n"
        "print(os.environ.get('THP_MEM_ALLOC_ENABLE'), int(huge.split()[1]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True, check=True)
    switch, huge_kb = done.stdout.splitlines()[-1].split()
    assert switch == "1"
    mode = re.search(r"\[(\w+)\]", Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()).group(1)
    if mode in ("madvise", "always"):
        assert int(huge_kb) >= 16 << 10  # most of the 32 MiB tensor
    else:
        assert int(huge_kb) == 0
