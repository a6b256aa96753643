"""Reading checks what it reads: command-line options of the read commands, secrets in what they print."""

import pytest

from flows import cli


def _one_line_exit_2(argv, capsys) -> str:
    assert cli.main(argv) == 2, argv
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("command", [["inspect"], ["verify"], ["export", "OUT.h5"]])
def test_a_password_in_the_uri_is_refused_without_echoing_it(command, tmp_path, capsys, monkeypatch):
    """`s3://user:pa/ss@bucket`: the userinfo pattern stopped at the '/', and the password was echoed."""
    monkeypatch.chdir(tmp_path)
    argv = [command[0], "s3://user:Zq9/pw0rd@bucket/kd", *command[1:]]
    err = _one_line_exit_2(argv, capsys)
    assert "credentials inside the URL" in err and "Zq9" not in err and "pw0rd" not in err, err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("option, message", [
    ("endpointUrl=http://127.0.0.1:9", r"--storage-option endpointUrl: .*did you mean --storage-option endpoint_url\?"),
    ("client_kwargs.regionName=eu", r"--storage-option client_kwargs\.regionName: .*client_kwargs\.region_name\?"),
    ("secret=Zq9pw0rd", r"--storage-option secret: credentials are not accepted on the command line"),
    ("client_kwargs.aws_secret_access_key=Zq9pw0rd", r"credentials are not accepted on the command line"),
    ("endpoint_url=http://u:Zq9pw0rd@host", r"credentials are not accepted on the command line"),
    ("Zq9pw0rd", r"--storage-option: expected KEY=VALUE"),
])
def test_storage_options_of_the_read_commands_are_checked_before_anything_is_read(option, message, tmp_path,
                                                                                   capsys):
    import re

    for argv in (["inspect", str(tmp_path)], ["verify", str(tmp_path)], ["export", str(tmp_path), str(tmp_path / "o.h5")]):
        err = _one_line_exit_2([*argv, "--storage-option", option], capsys)
        assert re.search(message, err) and "Zq9" not in err, err
