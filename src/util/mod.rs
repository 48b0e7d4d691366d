//! Leaf helpers every other module may use, and which use nothing of the crate: hex, random
//! identifiers, civil-date arithmetic, the one lock-poisoning policy, and the one rule for
//! showing outside text.

pub mod hex;
pub mod random;
pub mod sync;
pub mod text;
pub mod time;
