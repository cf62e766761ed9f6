"""Property tests of the ``shell!`` runner's line handling (the README's ``shell!PROGRAM ARG ...``).

The line is split once, the way a POSIX shell splits words, with no
variable, glob or command expansion; placeholders are replaced inside single
arguments only, so no value from a message can add an argument or run a
command. "Security": no value from a message reaches a shell, and job
processes do not inherit rbit's password variables. No broker is needed.
"""

import shlex

from hypothesis import given, settings
from hypothesis import strategies as st

from rbit.passwords import PASSWORD_ENV
from rbit.runners.shell import PLACEHOLDERS, job_environment, split, substitute

SETTINGS = settings(max_examples=300, deadline=None)

#: Text a hostile message could carry in a field: shell syntax, quotes, newlines, fake placeholders.
NASTY = ["", " ", "a b", "'", '"', ";", "; rm -rf /", "$(reboot)", "`id`", "\n", "\\", "$HOME",
         "*", "~", "%ID", "%%", "%PACKAGE%", "%", "-rf", "--", "\x00", "&&", "|", ">", "{a,b}"]
field_text = st.one_of(st.sampled_from(NASTY), st.text(max_size=40),
                       st.lists(st.sampled_from(NASTY + ["%" + p for p in PLACEHOLDERS]), max_size=5)
                       .map("".join))
fields_strategy = st.fixed_dictionaries({name: field_text for name in PLACEHOLDERS})

#: Literal text of a runner line's argument: anything but ``%`` (which must start a placeholder).
literal = st.text(st.characters(exclude_characters="%", exclude_categories=("Cs",)), min_size=1, max_size=12)
placeholder = st.sampled_from(PLACEHOLDERS + ("%",))
#: An argument as parts: ("lit", text) or ("ph", NAME); "%" stands for ``%%``.
part = st.one_of(literal.map(lambda text: ("lit", text)), placeholder.map(lambda name: ("ph", name)))
argument = st.lists(part, min_size=1, max_size=6)
arguments = st.lists(argument, min_size=1, max_size=6)


def template(parts):
    """The argument as written in the configuration (before quoting)."""
    return "".join(text if kind == "lit" else f"%{text}" for kind, text in parts)


def expected(parts, fields):
    """What one pass of substitution must make of the argument."""
    return "".join(text if kind == "lit" else ("%" if text == "%" else fields[text]) for kind, text in parts)


@SETTINGS
@given(arguments, fields_strategy)
def test_substitute_keeps_the_argument_count_and_replaces_once(args, fields):
    """For any line (quoted, split by ``split``) and any field values,
    ``substitute`` returns as many arguments as the line has, each the one-pass replacement of
    its own placeholders; placeholder-free arguments are unchanged."""
    line = " ".join(shlex.quote(template(parts)) for parts in args)
    argv = split(line)
    assert argv == [template(parts) for parts in args]
    result = substitute(argv, fields)
    assert len(result) == len(argv)
    for parts, before, after in zip(args, argv, result):
        assert after == expected(parts, fields)
        if "%" not in before:
            assert after == before


@SETTINGS
@given(st.lists(st.text(st.characters(exclude_characters=" \t\r\n'\"\\%", exclude_categories=("Cs",)),
                        min_size=1, max_size=15), min_size=1, max_size=8))
def test_split_never_expands_anything(words):
    """Unquoted words with ``$VAR``, globs, ``~``, ``$(...)``, backticks,
    ``;`` or ``|`` come out of ``split`` exactly as written, one argument each."""
    assert split(" ".join(words)) == words


def test_split_examples_from_the_contract():
    """Quotes group, backslash escapes, nothing is expanded."""
    assert split("/bin/sh -c 'make \"$0\"' %PACKAGE") == ["/bin/sh", "-c", 'make "$0"', "%PACKAGE"]
    assert split("echo $HOME ~ *.py $(id) `id` a;b {x,y}") == [
        "echo", "$HOME", "~", "*.py", "$(id)", "`id`", "a;b", "{x,y}"]
    assert split(r"prog a\ b 'c d' \"e") == ["prog", "a b", "c d", '"e']
    assert split("prog 100%% %VCS_ID") == ["prog", "100%%", "%VCS_ID"]


@SETTINGS
@given(fields_strategy)
def test_values_holding_placeholders_are_not_substituted_again(fields):
    """Substitution is a single pass: a value that contains ``%ID``
    or ``%%`` is inserted as it is."""
    argv = split("prog %PACKAGE x%VERSION%%%ID %URI")
    assert substitute(argv, fields) == [
        "prog", fields["PACKAGE"], f"x{fields['VERSION']}%{fields['ID']}", fields["URI"]]


def test_single_pass_example():
    """``%PACKAGE`` = ``%ID`` stays ``%ID``, not the job id."""
    assert substitute(["%PACKAGE", "%%ID"], {"PACKAGE": "%ID", "ID": "42"}) == ["%ID", "%ID"]


env_names = st.text(st.characters(min_codepoint=65, max_codepoint=90), min_size=1, max_size=10)


@SETTINGS
@given(st.dictionaries(env_names, st.text(max_size=10), max_size=8),
       st.dictionaries(st.text(min_size=1, max_size=12), field_text, max_size=5),
       fields_strategy, st.text(min_size=1, max_size=20), st.text(min_size=1, max_size=20))
def test_job_environment_never_holds_rbit_passwords(base, settings_, fields, amqp_secret, pybit_secret):
    """Job processes do not inherit rbit's password variables:
    whatever the base environment, settings and fields, the program's environment has neither
    RBIT_AMQP_PASSWORD nor RBIT_PYBIT_PASSWORD, and the rest of the base is kept."""
    base = {**base, PASSWORD_ENV["amqp"]: amqp_secret, PASSWORD_ENV["pybit"]: pybit_secret}
    env = job_environment(fields, settings_, base=base)
    assert PASSWORD_ENV["amqp"] not in env and PASSWORD_ENV["pybit"] not in env
    for name, value in base.items():
        if name not in PASSWORD_ENV.values() and not name.startswith("RBIT_"):
            assert env[name] == value
    for name in PLACEHOLDERS:
        assert env[f"RBIT_{name}"] == fields[name]
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())


def test_job_environment_from_os_environ_drops_passwords(monkeypatch):
    """With the passwords set in the worker's own environment,
    the job's environment (built from ``os.environ``) does not have them."""
    monkeypatch.setenv("RBIT_AMQP_PASSWORD", "amqp-secret-xyz")
    monkeypatch.setenv("RBIT_PYBIT_PASSWORD", "pybit-secret-xyz")
    monkeypatch.setenv("RBIT_TEST_KEEP", "kept")
    env = job_environment({"ID": "1"}, {"name": "World"})
    assert "RBIT_AMQP_PASSWORD" not in env and "RBIT_PYBIT_PASSWORD" not in env
    assert "amqp-secret-xyz" not in env.values() and "pybit-secret-xyz" not in env.values()
    assert env["RBIT_TEST_KEEP"] == "kept"
    assert env["RBIT_ID"] == "1" and env["RBIT_SETTING_NAME"] == "World"
