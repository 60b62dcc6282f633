"""The README and docs/ pages: every relative link leads somewhere, and every command they show uses flags its
script knows (its parser is built, not run: no data or model is loaded)."""

import argparse
import importlib
import re
import shlex
from pathlib import Path

import pytest

from trainer_runs import load_script

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def heading_anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # a "# comment" in a code block is no heading
    return {heading_anchor(line.lstrip("#")) for line in text.splitlines() if re.match(r"#{1,6} ", line)}


def links():
    for page in PAGES:
        for target in LINK.findall(page.read_text()):
            if not re.match(r"[a-z]+:", target):  # http(s), mailto: not checked offline
                yield page, target


@pytest.mark.parametrize("page, target", list(links()), ids=lambda value: str(value))
def test_every_relative_link_resolves(page, target):
    path, _, anchor = target.partition("#")
    destination = (page.parent / path).resolve() if path else page
    assert destination.exists(), f"{page.name}: {target} does not exist"
    if anchor:
        assert anchor in anchors(destination), f"{page.name}: no heading #{anchor} in {destination.name}"


def shell_commands(line: str):
    """The simple commands of a shell line (split at ;, &&, |, and a for loop's `do`), quotes respected."""
    lexer = shlex.shlex(line.replace("$", ""), posix=True, punctuation_chars=True)
    lexer.whitespace_split, command = True, []
    for token in lexer:
        if token in (";", "&&", "|", "||", "do", "done"):
            yield command
            command = []
        else:
            command.append(token)
    yield command


def commands():
    """(page, the script or module, its flags) for every python / accelerate command in a bash block."""
    for page in PAGES:
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                if line.lstrip().startswith("#"):
                    continue
                for words in shell_commands(line.split(" # ")[0]):
                    target = next((w for w in words if w.endswith(".py") or w == "immiscible_pipeline.evaluate"), None)
                    if target is None or words[0] not in ("python", "accelerate"):  # (target: words not empty)
                        continue
                    flags = [w.split("=")[0] for w in words[words.index(target) + 1:] if w.startswith("--")]
                    yield page.name, target, flags


class _Built(Exception):
    pass


def known_flags(target: str) -> set:
    """The option strings of a script's parser, caught as its parse_args would run."""
    module = (importlib.import_module(target) if target == "immiscible_pipeline.evaluate"
              else load_script(REPO / target))
    built = {}

    def catch(parser, *args, **kwargs):
        built["parser"] = parser
        raise _Built

    original = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = catch
    try:
        module.parse_args([])
    except _Built:
        pass
    finally:
        argparse.ArgumentParser.parse_args = original
    return set(built["parser"]._option_string_actions)


def test_the_pages_show_commands_of_every_script():
    shown = {target for _, target, _ in commands()}
    assert {"train_immiscible_ddim.py", "train_immiscible_cm.py", "train_immiscible_sd.py",
            "immiscible_pipeline.evaluate", "benchmarks/convergence.py", "benchmarks/noise_bias.py"} <= shown


def test_every_command_uses_flags_its_script_knows():
    parsers, unknown = {}, []
    for page, target, flags in commands():
        if target not in parsers:
            parsers[target] = known_flags(target)
        unknown += [f"{page}: {target} {flag}" for flag in flags if flag not in parsers[target]]
    assert not unknown, "\n".join(unknown)
