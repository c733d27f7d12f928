"""`slimconv push`: the model card, what is uploaded, the refusals and the errors, without reaching a server."""
import json
import shutil
import sys

import pytest
import yaml
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError

from helpers import with_word_tokenizer
from slimconv import hub
from slimconv.cli import main
from slimconv.errors import SlimError
from slimconv.recipe import json_schema, parse_recipe
from slimconv.report import card_text, load_bench

# The HTTP library huggingface_hub raises from (httpx or its httpx2 fork), to build its real error types.
http = sys.modules[hub._TRANSPORT_ERROR.__module__]


@pytest.fixture(scope="module")
def validated(tiny_models, tmp_path_factory):
    """A converted, exactness-validated tiny output (a non-uniform one: remote code)."""
    from slimconv.validate import run_validate

    root = tmp_path_factory.mktemp("push")
    src = with_word_tokenizer(tiny_models["llama-tied"], root / "src", 50)
    text = root / "text.txt"
    text.write_text(" ".join(f"w{i % 50}" for i in range(2000)))
    out = root / "slim-llama"
    recipe = root / "r.yaml"
    recipe.write_text(yaml.safe_dump(dict(
        model=str(src), remove={"attention": [2]}, output={"dir": str(out)},
        validate={"exactness": {"prompt_tokens": 16, "greedy_tokens": 8}, "quality": {"data": str(text)}})))
    assert main(["convert", str(recipe)]) == 0
    assert run_validate(out, skip_quality=True)["passed"]
    return out


@pytest.fixture
def out(validated, tmp_path):
    return shutil.copytree(validated, tmp_path / validated.name)


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def fake_onnx(out, passed=True):
    (out / "onnx").mkdir()
    (out / "onnx" / "model.onnx").write_bytes(b"\0" * 1000)
    (out / "onnx" / "slimconv_onnx_report.json").write_text(json.dumps(dict(
        provider="CPUExecutionProvider", dtype="float32", steps=16, passed=passed, export={"cache_pairs": 5},
        cases={"batch 1": dict(max_abs_error=3e-7, tolerance=2e-4, greedy_agreement="17/17", passed=passed)})))


@pytest.fixture
def no_hub(monkeypatch):
    """Every way of reaching the Hub raises: a test using this proves nothing was contacted."""
    def refuse(*a, **k):
        raise AssertionError("contacted the Hub")

    import huggingface_hub

    for name in ("create_repo", "create_commit", "upload_folder", "upload_file", "whoami"):
        monkeypatch.setattr(HfApi, name, refuse)
    monkeypatch.setattr(huggingface_hub, "get_token", refuse)


def test_card_front_matter_and_sections(out):
    meta = json.loads((out / "slimconv_plan.json").read_text())
    meta.update(base_model="someone/base-model", license="apache-2.0")
    (out / "slimconv_plan.json").write_text(json.dumps(meta))
    card = card_text(out, repo_id="me/slim-llama")
    front = front_matter(card)
    assert front["base_model"] == "someone/base-model" and front["license"] == "apache-2.0"
    assert front["library_name"] == "transformers" and front["pipeline_tag"] == "text-generation"
    assert {"slimconv", "pruned"} <= set(front["tags"]) and "onnx" not in front["tags"]
    for section in ("# slim-llama", "## Recipe", "## Plan", "## Validation", "Exactness", "## How to load"):
        assert section in card, section
    assert 'from_pretrained("me/slim-llama", trust_remote_code=True)' in card
    assert "Quality" in card and "not measured" in card  # validated with --skip-quality
    assert "## ONNX" not in card and "## Speed" not in card


def test_card_adds_onnx_and_speed_when_their_reports_exist(out):
    fake_onnx(out)
    rows = [{"model": "source", "runtime": "torch cpu", "decode tokens/s": 51.25},
            {"model": "slim", "runtime": "torch cpu", "decode tokens/s": 60.5, "note": "warm"}]
    (out / "slimconv_bench.json").write_text(json.dumps(rows))
    card = card_text(out)
    assert "onnx" in front_matter(card)["tags"]
    assert "## ONNX" in card and "17/17" in card and "onnxruntime_genai" in card and "ORTModelForCausalLM" in card
    assert "## Speed" in card
    assert "| model | runtime | decode tokens/s | note |" in card and "| source | torch cpu | 51.25 | - |" in card
    # Pushed without the ONNX folder, the card does not describe it.
    assert "## ONNX" not in card_text(out, onnx=False)


def test_bench_file_of_the_wrong_shape_is_a_clear_error(out):
    (out / "slimconv_bench.json").write_text(json.dumps({"decode": 60}))
    with pytest.raises(SlimError, match="list of rows"):
        load_bench(out)


def test_validate_rewrites_the_card_with_the_reports_present(out):
    from slimconv.report import write_card

    fake_onnx(out)
    write_card(out)
    assert "## ONNX" in (out / "README.md").read_text()


def test_uploaded_files_exclude_hidden_temp_and_onnx_unless_asked(out):
    (out / ".DS_Store").write_text("x")
    (out / ".slim-llama.tmp-123").mkdir()
    (out / ".slim-llama.tmp-123" / "model.safetensors").write_text("x")
    (out / "__pycache__").mkdir()
    (out / "__pycache__" / "modeling_slim.cpython-312.pyc").write_text("x")
    fake_onnx(out)
    (out / "onnx" / ".cache").write_text("x")
    (out / "README.md").unlink()
    files = hub.upload_files(out, include_onnx=False)
    assert "model.safetensors" in files and "slimconv_report.json" in files and "modeling_slim.py" in files
    assert "README.md" in files  # regenerated even if deleted
    assert not [f for f in files if f.startswith((".", "onnx", "__pycache__"))]
    with_onnx = hub.upload_files(out, include_onnx=True)
    assert set(with_onnx) - set(files) == {"onnx/model.onnx", "onnx/slimconv_onnx_report.json"}


def test_dry_run_lists_files_prints_card_contacts_nothing(out, no_hub, capsys):
    readme = (out / "README.md").read_text()
    assert main(["push", str(out), "--repo-id", "me/slim-llama", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    for f in hub.upload_files(out, include_onnx=False):
        assert f in printed
    assert "total:" in printed and "bytes" in printed and "nothing was uploaded" in printed
    assert "library_name: transformers" in printed and 'from_pretrained("me/slim-llama"' in printed
    assert (out / "README.md").read_text() == readme  # a dry run changes nothing


@pytest.mark.parametrize("state", ["never", "failed"])
def test_refuses_unvalidated_output_unless_forced(out, no_hub, capsys, state):
    if state == "never":
        (out / "slimconv_report.json").unlink()
    else:
        report = json.loads((out / "slimconv_report.json").read_text())
        (out / "slimconv_report.json").write_text(json.dumps(report | {"passed": False}))
    assert main(["push", str(out), "--repo-id", "me/x", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "refusing to push" in err and ("never ran" if state == "never" else "failed") in err
    assert "slimconv validate" in err and "--force" in err and "Traceback" not in err
    assert main(["push", str(out), "--repo-id", "me/x", "--dry-run", "--force"]) == 0


def test_include_onnx_needs_a_passed_export(out, no_hub, capsys):
    assert main(["push", str(out), "--repo-id", "me/x", "--dry-run", "--include-onnx"]) == 2
    assert "no model.onnx" in capsys.readouterr().err
    fake_onnx(out, passed=False)
    assert main(["push", str(out), "--repo-id", "me/x", "--dry-run", "--include-onnx"]) == 2
    assert "ONNX export check" in capsys.readouterr().err
    assert main(["push", str(out), "--repo-id", "me/x", "--dry-run", "--include-onnx", "--force"]) == 0
    assert "onnx/model.onnx" in capsys.readouterr().out


@pytest.mark.parametrize("repo_id", ["a/b/c", "me/bad--name", "me/x.git"])
def test_bad_repo_id(out, no_hub, capsys, repo_id):
    assert main(["push", str(out), "--repo-id", repo_id, "--dry-run"]) == 2
    assert "not a Hub repository id" in capsys.readouterr().err


def test_not_an_output(tmp_path, no_hub, capsys):
    assert main(["push", str(tmp_path), "--repo-id", "me/x", "--dry-run"]) == 2
    assert "not a slimconv output" in capsys.readouterr().err


def test_no_token(out, monkeypatch, capsys):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    assert main(["push", str(out), "--repo-id", "me/x"]) == 2
    err = capsys.readouterr().err
    assert "no Hugging Face token" in err and "hf auth login" in err and "HF_TOKEN" in err


def test_offline_mode_is_a_clear_error_and_the_token_is_never_shown(out, monkeypatch, capsys):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_SECRETtoken")
    # HF_HUB_OFFLINE=1 (tests/conftest.py): huggingface_hub itself refuses the request, nothing is sent.
    assert main(["push", str(out), "--repo-id", "me/x"]) == 2
    captured = capsys.readouterr()
    assert "HF_HUB_OFFLINE" in captured.err and "me/x" in captured.err and "Traceback" not in captured.err
    assert "hf_SECRET" not in captured.out + captured.err


def _http_error(status):
    request = http.Request("POST", "https://huggingface.co/api/repos/create")
    return HfHubHTTPError(f"{status} Client Error", response=http.Response(status, request=request))


@pytest.mark.parametrize("error, expected", [
    (http.ConnectError("[Errno 111] Connection refused"), "cannot reach the Hugging Face Hub"),
    (ConnectionError("Network is unreachable"), "cannot reach the Hugging Face Hub"),
    (_http_error(401), "rejected the token"),
    (_http_error(403), "may not write to me/x"),
    (_http_error(500), "refused the push to me/x (500)"),
])
def test_hub_errors_name_the_repo_and_the_fix(out, monkeypatch, capsys, error, expected):
    import huggingface_hub

    def fail(*a, **k):
        raise error

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_SECRETtoken")
    monkeypatch.setattr(HfApi, "create_repo", fail)
    assert main(["push", str(out), "--repo-id", "me/x"]) == 2
    err = capsys.readouterr().err
    assert expected in err and "me/x" in err and "fix:" in err and "Traceback" not in err
    assert "hf_SECRET" not in err


@pytest.fixture
def recorded(monkeypatch):
    """HfApi with its Hub calls recorded instead of sent."""
    import huggingface_hub

    calls = []

    class Commit:
        commit_url = "https://huggingface.co/me/x/commit/abc"

    def create_repo(self, repo_id, **kw):
        calls.append(("create_repo", repo_id, kw))

    def create_commit(self, repo_id, operations, **kw):
        calls.append(("create_commit", repo_id, dict(kw, operations=list(operations))))
        return Commit()

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_SECRETtoken")
    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    return calls


def test_push_creates_the_repo_and_makes_one_commit(out, recorded, capsys):
    fake_onnx(out)
    (out / ".hidden").write_text("x")
    assert main(["push", str(out), "--repo-id", "me/x", "--private", "--include-onnx"]) == 0
    assert [c[0] for c in recorded] == ["create_repo", "create_commit"]
    _, repo, kw = recorded[0]
    assert repo == "me/x" and kw["private"] is True and kw["exist_ok"] is True
    ops = recorded[1][2]["operations"]
    assert sorted(op.path_in_repo for op in ops) == hub.upload_files(out, include_onnx=True)
    card = next(op.path_or_fileobj for op in ops if op.path_in_repo == "README.md")
    assert b'from_pretrained("me/x", trust_remote_code=True)' in card and b"## ONNX" in card
    printed = capsys.readouterr()
    assert "huggingface.co/me/x/commit/abc" in printed.out and "hf_SECRET" not in printed.out + printed.err


def test_recipe_push_stage(validated, tmp_path, recorded):
    recipe = dict(model="default", output={"dir": str(validated)}, stages=["push"],
                  push={"repo_id": "me/x", "private": True})
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump(recipe))
    assert main(["run", str(r)]) == 0
    assert [c[0] for c in recorded] == ["create_repo", "create_commit"] and recorded[0][2]["private"] is True
    assert not any(op.path_in_repo.startswith("onnx/") for op in recorded[1][2]["operations"])


def test_recipe_push_section_is_checked_before_any_work():
    base = dict(model="default", output={"dir": "o"})
    with pytest.raises(SlimError, match="no push section"):
        parse_recipe(base | {"stages": ["convert", "push"]})
    with pytest.raises(SlimError, match="push.repo_id"):
        parse_recipe(base | {"push": {"repo_id": "a/b/c"}})
    with pytest.raises(SlimError, match="did you mean 'include_onnx'"):
        parse_recipe(base | {"push": {"repo_id": "me/x", "include_onx": True}})
    assert parse_recipe(base | {"stages": ["convert", "validate", "push"], "push": {"repo_id": "me/x"}}).push.private is False
    assert "push" in json_schema()["properties"]
