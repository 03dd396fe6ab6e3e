"""A sample clawbot plugin, registered by the hand-written dist-info next to this package.

Putting `tests/plugins/sample` on `sys.path` (or `PYTHONPATH`) makes `importlib.metadata` find
`clawbot_sample_plugin-0.1.dist-info`, whose `entry_points.txt` registers:

- `sample_tenant` (`clawbot.policies`): `tenant.TenantPolicy`;
- `sample` (`clawbot.backends`): `echo.EchoBackend`, for model backends `sample:<label>`.
"""
