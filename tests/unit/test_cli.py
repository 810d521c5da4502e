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
