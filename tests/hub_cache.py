"""A populated Hugging Face Hub cache, built the way ``huggingface_hub`` lays it out (no network).

``<cache>/models--owner--name/blobs/<sha256>`` hold the file contents, ``snapshots/<commit>/<path>`` are relative
symlinks to them and ``refs/main`` names the commit: what ``hf_hub_download`` / ``snapshot_download`` resolve
offline (``HF_HUB_OFFLINE=1``). ``evaluate`` metrics live in evaluate's own download cache instead (a file named
by the hash of its Hub URL, see :func:`populate_evaluate_cache`).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping


def populate_hub_cache(cache_dir, repo_id: str, files, repo_type: str = "model", commit: str | None = None) -> str:
    """Put ``files`` (a folder, or ``{path_in_repo: bytes}``) into the cache as ``repo_id`` at ``refs/main``.

    Returns the 40-hex commit hash of the snapshot."""
    if isinstance(files, Mapping):
        contents = dict(files)
    else:
        contents = {}
        for dirpath, _, names in os.walk(files):
            for name in names:
                src = os.path.join(dirpath, name)
                with open(src, "rb") as f:
                    contents[os.path.relpath(src, files).replace(os.sep, "/")] = f.read()
    commit = commit or hashlib.sha1(repr(sorted(contents.items())).encode()).hexdigest()
    root = os.path.join(os.fspath(cache_dir), f"{repo_type}s--" + repo_id.replace("/", "--"))
    for path, data in contents.items():
        blob = os.path.join(root, "blobs", hashlib.sha256(data).hexdigest())
        os.makedirs(os.path.dirname(blob), exist_ok=True)
        with open(blob, "wb") as f:
            f.write(data)
        link = os.path.join(root, "snapshots", commit, *path.split("/"))
        os.makedirs(os.path.dirname(link), exist_ok=True)
        if os.path.lexists(link):
            os.remove(link)
        os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)
    os.makedirs(os.path.join(root, "refs"), exist_ok=True)
    with open(os.path.join(root, "refs", "main"), "w") as f:
        f.write(commit)
    return commit


def populate_evaluate_cache(downloads_dir, repo_id: str, script_path) -> str:
    """Put a metric script where ``evaluate.load(repo_id)`` finds it offline: evaluate's download cache, under the
    hash of ``https://huggingface.co/spaces/<repo_id>/resolve/<evaluate's script version>/<name>.py``."""
    import evaluate
    from evaluate.utils.file_utils import hash_url_to_filename, hf_hub_url

    revision = os.getenv("HF_SCRIPTS_VERSION", evaluate.SCRIPTS_VERSION)
    if re.match(r"\d*\.\d*\.\d*", revision):
        revision = "v" + revision  # evaluate's tag convention (as in HubEvaluationModuleFactory.get_module)
    url = hf_hub_url(path=repo_id, name=repo_id.split("/")[1] + ".py", revision=revision)
    os.makedirs(downloads_dir, exist_ok=True)
    target = os.path.join(os.fspath(downloads_dir), hash_url_to_filename(url, etag=None))
    with open(script_path, "rb") as src, open(target, "wb") as dst:
        dst.write(src.read())
    return target
