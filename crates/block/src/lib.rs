//! The block layer: opening images and their backing chains, guest I/O, range locks.
