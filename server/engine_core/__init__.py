"""The boundary between the API (HTTP, auth, limits, tokenisation, JSON) and the engine core (device, backbone,
resident adapters with their leases, the batcher): one ``EngineClient`` interface, served in process
(``local.LocalEngineClient``) or by an engine core process over ZeroMQ (``remote.RemoteEngineClient`` in each API
worker, ``core_proc`` in the core), started and restarted by ``supervisor``. docs/design.md, "Engine core and API
workers (issue 12)"."""
