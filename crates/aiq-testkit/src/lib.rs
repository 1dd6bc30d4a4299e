//! aiq's test kit, used only as a dev-dependency and by the developer binary `aiq-dev`: the fake
//! providers in their real wire formats ([`fake`]) and throw-away redis-server, Redis Cluster and
//! PostgreSQL instances and a test certificate authority ([`localsvc`]). It does not depend on aiq:
//! the fake knows the providers' wire formats, not aiq's parsers.

pub mod fake;
pub mod local;
pub mod localsvc;
