//! The PetlJob controller.
