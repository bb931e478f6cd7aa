//! groupcall-proto: sans-IO MSC3401 core.
