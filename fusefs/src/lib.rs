//! logtap's FUSE filesystem: log volumes whose writes are captured in memory and never reach a
//! disk. [`model`] holds the behaviour (inodes, offsets, high-water marks), [`fuse`] adapts it to
//! the kernel's requests, [`capture`] is where the captured bytes leave.

pub mod capture;
pub mod fuse;
pub mod model;
mod name;
mod tail;

pub use capture::{Capture, Stream};
pub use fuse::{mount, MountOptions, MountedFs};
pub use model::{Model, Options, Owner};
pub use name::{is_name_char, Name, NameError, NAME_MAX};
