//! Leaf helpers every other module may use, and which use nothing of the crate: hex, random
//! identifiers, civil-date arithmetic, and the one lock-poisoning policy.

pub mod hex;
pub mod random;
pub mod sync;
pub mod time;
