pub mod mapping;
pub mod utf7;
