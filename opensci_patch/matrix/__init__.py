"""Layer 3, the cross-version matrix: `spec` declares releases, variants, cells and what each must do
(standard library only, read by the noxfile); `releases` resolves the release list from the package index;
`overrides` the dependency overrides; `envs`, `venv` and `torch_links` build one environment per
(release, torch build); `worker` runs typed capture steps inside one (the protocol of `_util.child`);
`hotfix_cache` hotfixes each variant in the driver's process and keeps it across runs; `runner` runs cells.
Uses `_util`, `rewrite`, `measure` and `fixtures`. This file imports nothing, so importing `matrix.spec` stays
stdlib-only."""

__all__ = ["envs", "hotfix_cache", "overrides", "releases", "runner", "spec", "torch_links", "venv", "worker"]
