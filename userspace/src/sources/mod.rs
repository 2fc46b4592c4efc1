//! Sources: where records come from. Each frames its bytes with the one [`crate::framer`] and
//! pushes records into the one [`crate::ring`].

pub mod volume;
