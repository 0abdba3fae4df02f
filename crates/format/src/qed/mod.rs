//! The qed driver (being written).

use crate::error::{Error, Result};
use crate::{CreateOptions, OpenOptions, Storage};
use std::sync::Arc;

#[derive(Debug)]
pub struct Qed;

impl Qed {
    pub fn open(_storage: Arc<dyn Storage>, _options: OpenOptions) -> Result<crate::raw::Raw> {
        Err(Error::unsupported("qed is not implemented yet"))
    }
}

pub fn create(_storage: &dyn Storage, _options: &CreateOptions) -> Result<()> {
    Err(Error::unsupported("qed is not implemented yet"))
}
