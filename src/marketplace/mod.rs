//! KooGallery's seller open API: the order query, signed with API Gateway
//! AK/SK signing ([`apig`]).

pub mod apig;
pub mod order;
pub mod usage;
