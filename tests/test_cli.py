"""The `vllm-tokenprune` command: every subcommand's help renders (option help is
%-formatted by argparse, so a stray % in a dataclass field's help breaks it)."""

from __future__ import annotations

import pytest

from vllm_tokenprune.cli import SUBCOMMANDS, main


@pytest.mark.parametrize("name", [n for n in SUBCOMMANDS if n != "vllm"])  # `vllm` is vLLM's own help
def test_every_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([name, "--help"])
    assert exit_.value.code == 0
    assert SUBCOMMANDS[name][1] in " ".join(capsys.readouterr().out.split())
