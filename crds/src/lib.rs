//! The PetlJob API: types, defaults, validation rules, and the CRD generator.
