"""The boundary between the API (HTTP, auth, limits, tokenisation, detokenisation and stop strings, JSON) and the
engine core (device, backbone, resident adapters with their leases, the batcher, the generation runner): one
``EngineClient`` interface, served in process (``local.LocalEngineClient``) or by an engine core process over
ZeroMQ (``remote.RemoteEngineClient`` in each API worker, ``core_proc`` in the core), started and restarted by
``supervisor``. Encoder rows cross it as token ids and come back as outputs (``client.encode_texts``); generations
cross it as token ids and come back as a stream of token messages that the API turns into text (``streams``).
docs/design.md, "Engine core and API workers (issue 12)"."""
