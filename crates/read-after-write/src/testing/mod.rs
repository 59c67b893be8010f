//! Test support shared by the unit tests, the integration tests and the
//! benches. Never part of the crate's API: it is compiled only for the
//! unit tests here, and the other targets include its files by path.

mod fake_backend;

pub(crate) use self::fake_backend::FakeBackend;
