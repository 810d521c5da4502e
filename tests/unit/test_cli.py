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
