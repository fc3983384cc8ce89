"""Models: the bundle and its schema, the guard, the runtime choice, serving.

| module | job |
|---|---|
| ``manifest`` | the one schema of bundle.json (pydantic), shared with CONTRACT.toml's sections |
| ``bundle`` | load and check a bundle directory (every sha256) into its runtime view |
| ``contract`` | CONTRACT.toml, the operator's input to ``model quantize`` |
| ``guard`` | the int8 accuracy guard run on every load |
| ``preprocess`` | a slice onto the model grid and back; normalisation |
| ``select`` | ``backend = "auto"``: time runtime x precision, serve the fastest that passes |
| ``candidates`` | ``auto``'s candidate files; opening, guarding and timing them |
| ``choice`` | what ``auto`` weighed and why it chose |
| ``choice_cache`` | the file where ``auto`` remembers its choice |
| ``serving`` | load the model a config names: bundle, runtime (or ``auto``), guard |
| ``domain`` | the domain-shift statistics of one slice and their Mahalanobis metric |
| ``domain_reference`` | domain.json: schema, loading, fitting, the per-slice score |
"""
