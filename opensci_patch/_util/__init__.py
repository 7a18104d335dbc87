"""The small shared base every layer may use, and which uses none of them: errors, project-wide defaults, fault
points for the fault tests, files and directories we own (atomic writes, claimed directories, discards, locks),
child processes and their one protocol (`child`), where built things live, the model directory's config reader,
and parsed options handed on by name. Standard library only, so the noxfile and CI scripts can import it with no
torch or transformers around."""

__all__ = ["child", "defaults", "errors", "faults", "fs", "locations", "model_dir", "options", "outputs", "procs"]
