//! logtap's FUSE filesystem: log volumes whose files live in memory and never reach a disk.
//! [`model`] holds the namespace (inodes, names, handles), [`tap`] one file's content and how
//! far it was captured, [`reader`] the thread that captures new bytes, [`fuse`] adapts it all to
//! the kernel's requests (passthrough where allowed), [`capture`] is where captured bytes leave.

pub mod backing;
pub mod capture;
pub mod connection;
pub mod fuse;
pub mod journal;
pub mod kept;
pub mod model;
mod name;
pub mod reader;
mod sync;
pub mod tap;

pub use capture::{Capture, Serving, Stream};
pub use connection::Connection;
pub use fuse::{mount, resume, MountOptions, MountedFs};
pub use journal::Journal;
pub use model::{Model, Options, Owner};
pub use name::{is_name_char, Name, NameError, NAME_MAX};
pub use tap::Settings;
