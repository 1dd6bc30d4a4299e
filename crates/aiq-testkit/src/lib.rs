//! aiq's test kit, used only as a dev-dependency and by the developer binary `aiq-dev`: the fake
//! providers in their real wire formats ([`fake`]) and throw-away redis-server, Redis Cluster and
//! PostgreSQL instances and a test certificate authority ([`localsvc`]), the local set-up's
//! settings ([`local`]), the test world's payload builders and waits ([`world`]), and a WebDriver
//! client that drives a headless Chromium ([`webdriver`]). It does not
//! depend on aiq (only on the queue engine, for its typed tiers): the fake knows the providers'
//! wire formats, not aiq's parsers.

pub mod fake;
pub mod local;
pub mod localsvc;
pub mod webdriver;
pub mod world;
