"""Publishing a slim output on the Hugging Face Hub: what is uploaded, the checks before it, one commit."""
from contextlib import contextmanager
from pathlib import Path

from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

from .errors import SlimError
from .outdir import CARD_FILE, ONNX_DIR, ONNX_REPORT, REPORT_FILE, read_json, require_output
from .report import card_text, console, write_card

LOGIN_FIX = "log in with `hf auth login` (or `huggingface-cli login`), or set HF_TOKEN to a token with write access"


def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise SlimError(f"{repo_id!r} is not a Hub repository id: {e}",
                        'give "namespace/name" (letters, digits, "-", "_", "."; no "--" or "..")') from None


def _skipped(rel: Path, include_onnx: bool) -> bool:
    # Hidden names cover the converter's and exporter's in-progress ".NAME.tmp-PID" folders and editor files.
    return (any(p.startswith(".") or p == "__pycache__" for p in rel.parts)
            or (rel.parts[0] == ONNX_DIR and not include_onnx))


def upload_files(out: Path, include_onnx: bool) -> list[str]:
    """Paths (relative, '/'-separated, sorted) of the files a push uploads; README.md is always among them."""
    files = {p.relative_to(out).as_posix() for p in out.rglob("*")
             if p.is_file() and not _skipped(p.relative_to(out), include_onnx)}
    return sorted(files | {CARD_FILE})  # the card is regenerated, so it is uploaded even if deleted locally


def _passed(path: Path) -> bool | None:
    """The "passed" verdict of a report file; None when the check never ran."""
    return read_json(path).get("passed") if path.is_file() else None


def check_publishable(out: Path, include_onnx: bool, force: bool) -> None:
    """Refuses an output whose validation (or, with the ONNX folder, export check) failed or never ran."""
    require_output(out)
    if include_onnx and not (out / ONNX_DIR / "model.onnx").is_file():
        raise SlimError(f"--include-onnx, but {out / ONNX_DIR} has no model.onnx",
                        f"run `slimconv export {out}` first, or push without --include-onnx")
    checks = [("validation", out / REPORT_FILE, f"slimconv validate {out}")]
    if include_onnx:
        checks.append(("the ONNX export check", out / ONNX_REPORT, f"slimconv export {out} --force"))
    for what, report, command in checks:
        verdict = _passed(report)
        if verdict is True or force:
            continue
        problem = (f"{what} of {out} never ran ({report.name} is missing)" if verdict is None
                   else f"{what} of {out} failed (see {report})")
        raise SlimError(f"refusing to push: {problem}", f"run `{command}` until it passes, or pass --force")


def check_exports(out: Path, files: list[str]) -> None:
    """Refuses a push that would upload an export made from other weights than the folder's own (a GGUF or
    ONNX graph that engines load and run, under a card that describes another model); warns about exports
    that record nothing."""
    from .provenance import find_exports, stale_message, unrecorded_message

    uploaded = set(files)
    for export in find_exports(out):
        rel = (export.path / "model.onnx" if export.kind == "onnx" else export.path).relative_to(out).as_posix()
        if rel not in uploaded:
            continue
        if export.status == "stale":
            problem, fix = stale_message(export, out)
            raise SlimError(f"refusing to push: {problem}", fix)
        if export.status == "unrecorded":
            console.print(f"[yellow]warning:[/] {unrecorded_message(export)}")


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _print_listing(out: Path, files: list[str], card_bytes: int) -> None:
    from rich.table import Table

    sizes = [card_bytes if f == CARD_FILE else (out / f).stat().st_size for f in files]
    console.print(f"files to upload from {out}:")
    t = Table(header_style="bold")
    t.add_column("path")
    t.add_column("size", justify="right")
    for f, n in zip(files, sizes):
        t.add_row(f, _size(n))
    console.print(t)
    console.print(f"total: {len(files)} files, {_size(sum(sizes))} ({sum(sizes)} bytes)")


# huggingface_hub 1.x talks through httpx (or its httpx2 fork); its HTTP status error derives from that library's
# base error, which also covers connection failures and timeouts. Taken from there to name neither package.
_TRANSPORT_ERROR = next(c for c in HfHubHTTPError.__mro__[1:] if c.__name__ == "HTTPError")


@contextmanager
def _hub_errors(repo_id: str):
    """Turns what huggingface_hub raises into a problem and its fix, naming the repository."""
    try:
        yield
    except OfflineModeIsEnabled:
        raise SlimError(f"cannot push to {repo_id}: HF_HUB_OFFLINE is set, so huggingface_hub makes no network calls",
                        "unset HF_HUB_OFFLINE, or use --dry-run to see what would be uploaded") from None
    except HfHubHTTPError as e:
        status = e.response.status_code
        if status == 401:
            raise SlimError(f"the Hub rejected the token while pushing to {repo_id} (401 unauthorized)",
                            LOGIN_FIX) from None
        if status == 403:
            raise SlimError(f"the token may not write to {repo_id} (403 forbidden)",
                            "use a token with write access to that namespace (a fine-grained token needs write "
                            "permission on it), or push to your own namespace") from None
        raise SlimError(f"the Hub refused the push to {repo_id} ({status}): {str(e).splitlines()[0]}",
                        "check the repository id and your access to it, then try again") from None
    except (ConnectionError, TimeoutError, _TRANSPORT_ERROR) as e:
        raise SlimError(f"cannot reach the Hugging Face Hub to push {repo_id} ({type(e).__name__}: {e})",
                        "check the network connection (and HF_ENDPOINT or proxy settings), then try again") from None


def push(out, repo_id: str, private: bool = False, include_onnx: bool = False, dry_run: bool = False,
         force: bool = False) -> str | None:
    """Uploads a slim output folder to `repo_id` in one commit; returns the commit URL (None for a dry run).

    The model card is regenerated from the reports present before uploading. A dry run reads only local
    files: no token lookup (which can itself reach a server under OIDC), no Hub call.
    """
    out = Path(out)
    check_repo_id(repo_id)
    check_publishable(out, include_onnx, force)
    card = card_text(out, repo_id=repo_id, onnx=include_onnx).encode()
    files = upload_files(out, include_onnx)
    check_exports(out, files)
    _print_listing(out, files, len(card))
    if dry_run:
        console.rule(f"{CARD_FILE} (model card)")
        print(card.decode())
        console.print(f"dry run: nothing was uploaded to {repo_id}")
        return None

    from huggingface_hub import CommitOperationAdd, HfApi, get_token

    token = get_token()
    if not token:
        raise SlimError(f"no Hugging Face token found to push to {repo_id}", LOGIN_FIX)
    write_card(out)  # keep the local card as current as the uploaded one
    ops = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=card if f == CARD_FILE else str(out / f))
           for f in files]
    api = HfApi(token=token)
    with _hub_errors(repo_id):
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.create_commit(repo_id, operations=ops, repo_type="model",
                                   commit_message=f"Upload {out.name} (slimconv)")
    console.print(f"[green]pushed[/] {len(files)} files to {commit.commit_url}")
    return commit.commit_url
