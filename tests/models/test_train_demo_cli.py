"""`loong-jax train-demo --help`: a whole description (not cut mid-sentence) and a help line for every setting."""

import dataclasses

import pytest

from loong_jax.models.train_demo import TrainSettings, parse_args


def test_help_describes_every_setting(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = capsys.readouterr().out
    assert "(and is the default model wherever none is named)." in " ".join(text.split())
    lines = text.splitlines()
    for field in dataclasses.fields(TrainSettings):
        flag = f"--{field.name.replace('_', '-')}"
        (index,) = [i for i, line in enumerate(lines) if line.strip().startswith(flag + " ")]
        end = next((i for i in range(index + 1, len(lines)) if not lines[i].startswith(" " * 6)), len(lines))
        entry = " ".join(lines[index:end])  # the flag's line and its wrapped help lines
        assert "(default: " in entry, entry
