"""What the tests share, imported as `helpers.<module>` (tests/ is on sys.path; benches add it):
tiny (the tiny model and pipeline config), engine (transformers' references for the engine), paged
(random paged K/V cases), ops (the ops' two paths), rows (training data sets), processes (kill and
resume), cli (one-line errors), attacks (judge prompt injections), fake_server and vllm_server.
Fixtures stay in conftest.py."""
