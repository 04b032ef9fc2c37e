"""Activity driver `files` through the daemon (in process): a source that yields nothing is an
error, not a completed empty bag, unless the activity says `allow_empty = true`."""

from __future__ import annotations

from typing import Any

from conftest import Root


async def test_a_source_that_yields_nothing_fails_unless_allowed(root: Root) -> None:
    empty = root.sources / "empty"
    empty.mkdir()
    (root.sources / "tmp-only").mkdir()
    (root.sources / "tmp-only" / "scratch.tmp").write_text("not wanted\n")

    def activity(path: str, **extra: Any) -> dict[str, Any]:
        return {"name": "a", "driver": "files", "path": str(root.sources / path), **extra}

    jobs = {
        "all-excluded": activity("a", exclude=["*"]),
        "empty-dir": activity("empty"),
        "only-tmp-files": activity("tmp-only", exclude=["*.tmp"]),
        "empty-allowed": activity("empty", allow_empty=True),
    }
    ids = {
        name: root.drop(root.job_file(name, activities=[spec]))[0] for name, spec in jobs.items()
    }
    await root.run_until_idle()
    done = {name: await root.details(job_id) for name, job_id in ids.items()}

    for name in ("all-excluded", "empty-dir", "only-tmp-files"):
        job = done[name]
        assert job["state"] == "failed", (name, job["state"], job["error"])
        assert "nothing to archive" in job["error"] and "allow_empty" in job["error"], job
        states = [h["state"] for h in job["history"]]
        assert "recoverable_error" not in states, f"{name}: retried, but retrying cannot help"
    assert "excluded" in done["all-excluded"]["error"]
    assert done["empty-allowed"]["state"] == "completed", done["empty-allowed"]["error"]
    assert len(root.archives("primary")) == 1
