//! The QMP server.
